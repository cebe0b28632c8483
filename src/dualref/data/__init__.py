"""Data sets, records, transforms, samplers and loaders."""
