"""Region data layer: grid, POIs, imagery, labels, featurisation, synthetic city (paper 3, 4.1.1)."""
