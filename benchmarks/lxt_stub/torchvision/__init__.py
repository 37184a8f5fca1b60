"""A stand-in for torchvision, so that LXT 2.1 imports without it (benchmarks/lrp_lxt.py).

LXT's efficient package imports its ViT patches, and zennit its ResNet canonizers, at import
time; neither is used on language models. Only the names they touch exist here.
"""
