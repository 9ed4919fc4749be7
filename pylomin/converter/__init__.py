"""The converter: source checkpoints become unit files and a manifest. It never imports the runtime."""
