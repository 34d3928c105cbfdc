"""Built-in plugin decompositions: being written (see the open issues); no hooks yet."""
