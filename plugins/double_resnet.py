"""Built-in plugin double_resnet: being written (see the open issues); no hooks yet."""
