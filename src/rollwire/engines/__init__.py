"""Engine backends. ``hf`` runs anywhere; ``sglang`` needs the ``rollwire[sglang]`` extra."""
