"""DC programs and the DCA loop (being written)."""
