"""The local image store: formats, uploads, aliases, unpacking and publishing."""
