import sys

from decode_service.main import main

sys.exit(main())
