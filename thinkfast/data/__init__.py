"""The corpus data layer: schema and streaming reads (local / S3), image and video
decoding, tokenisers, loaders for public caption data sets, and the generated corpus.

Submodules are imported where used (``from thinkfast.data.image import decode_image``);
nothing heavy loads with the package itself.
"""
