import sys

from pagedjax.entrypoints.openai.api_server import main

sys.exit(main())
