"""Icons, texts and sample images, found through core.paths.resources_dir()."""
