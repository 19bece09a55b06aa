"""Model families beyond torchvision's layout: each recognises its own files and builds torch modules
(or ONNX graphs) that the runtime layer serves like any other model."""
