"""Photos of an object -> textured 3D model. The library behind the app and the CLI (no gradio here)."""
