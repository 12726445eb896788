"""pni-jax: PNI (position and neighbourhood information) anomaly detection in JAX/Flax."""

__version__ = '0.1.0'
