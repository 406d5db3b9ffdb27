"""The toy Krea 2: Krea 2's own classes at tiny sizes, *trained* on a procedural world whose truth is known.

`world` draws the scenes (objects, captions, masks), `train` fits the VAE, text_fusion and DiT on them, `weights/`
holds the committed result, `checkpoints` writes it into the cache as real checkpoints, `evaluate` scores generated
images against the scenes. Its numbers test the tool and the methods, not Krea 2.
"""
