"""kaedama: self-hosted, Kubernetes-native AutoML Vision for image classification.

The core library is pure logic with values in and values out. It never imports
``kfp`` or ``apache_beam``; the deployable layers (``beam/``, ``components/``,
``pipelines/``) import it.
"""

__version__ = "0.1.0"
