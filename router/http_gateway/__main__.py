import sys

from router.http_gateway.server import main

sys.exit(main())
