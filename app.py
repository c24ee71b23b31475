"""Photos to 3D: the Gradio app. `python app.py --help` lists the options.

Host and port come from --host/--port, else GRADIO_SERVER_NAME / GRADIO_SERVER_PORT, else
127.0.0.1:7860. On a Hugging Face Space this file is the entry point (README front matter).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import List, Optional


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Web app: photos of one object (+ masks + camera file) -> textured 3D model (GLB / OBJ).",
    )
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="address to listen on; 0.0.0.0 for every interface (default: $GRADIO_SERVER_NAME or 127.0.0.1)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
                        help="port to listen on (default: $GRADIO_SERVER_PORT or 7860)")
    parser.add_argument("--share", action="store_true", help="also publish a temporary public *.gradio.live link")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if os.environ.get("SPACES_ZERO_GPU"):
        import spaces  # noqa: F401, PLC0415 (ZeroGPU patches torch when imported: before torch loads)
    # Imported after parsing so that --help answers at once (gradio and torch load slowly).
    from pipeline.memory import limit_heap_arenas  # noqa: PLC0415
    from ui.layout import build_app  # noqa: PLC0415

    limit_heap_arenas()  # before the server's threads: see pipeline/memory.py
    from pipeline.reconstruct import preload  # noqa: PLC0415

    preload()

    app = build_app()
    # `docker stop` and Spaces send SIGTERM: leave through the same cleanup as Ctrl-C.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        app.launch(server_name=args.host, server_port=args.port, share=args.share, show_error=True)
    finally:
        app.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
