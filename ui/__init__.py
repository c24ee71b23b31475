"""The Gradio app on top of `pipeline`: page layout, event handlers, sessions and devices."""
