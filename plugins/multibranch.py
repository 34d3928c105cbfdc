"""Built-in plugin multibranch: being written (see the open issues); no hooks yet."""
