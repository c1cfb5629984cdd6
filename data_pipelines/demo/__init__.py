"""The embedded demo: synthetic COCO-format sources (``synthetic``) and their shards (``shards``)."""
