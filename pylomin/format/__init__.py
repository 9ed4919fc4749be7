"""The on-disk format shared by the converter and the runtime; it knows no modules."""
