"""resnet-serve: an HTTP model server for torchvision ResNet image classifiers."""

__version__ = "0.1.0"
