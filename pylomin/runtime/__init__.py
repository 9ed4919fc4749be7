"""The runtime: a converted folder becomes a live model paged in per unit. It never imports the converter."""
