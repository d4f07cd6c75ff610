"""ovseg_jax: OVSegmentor (open-vocabulary semantic segmentation from image-caption pairs) in JAX/Flax."""

__version__ = '0.1.0'
