import sys

from prefill_service.main import main

sys.exit(main())
