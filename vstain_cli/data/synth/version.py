"""The phantom generator's version: recorded in every slide and in synth.json beside pairs.csv.

Bump it whenever the phantom's pixels change for the same seed, so datasets and
models made from phantoms can say which phantom they saw.
"""

PHANTOM_VERSION = "liver-2.0"
