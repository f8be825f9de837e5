"""``python -m lora_gradio``: the command-line interface."""

import sys

from .cli import main

sys.exit(main())
