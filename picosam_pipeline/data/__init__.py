"""Phase 1, data: COCO/LVIS annotations and their checks, image decoding, the instance index, the two crop
conventions, the built-in sample and the asset downloader. Imports no other phase."""
