r"""Finding the modes of a log-density and telling them apart: the one mode finder that the diffusion
sampler, the training-free smoothed score and divide and conquer share.

- :mod:`~diffstat.modes.climb`: gradient ascent to a local maximum, with an adapted step that only
  climbs (:func:`~diffstat.modes.climb.hill_climb`) or with a fixed step, a basin map
  (:func:`~diffstat.modes.climb.ascend`).
- :mod:`~diffstat.modes.barriers`: the barrier test on the segment between two points
  (:func:`~diffstat.modes.barriers.no_barrier`) and the leader clusterings and merging built on it.
- :mod:`~diffstat.modes.laplace`: Hessians, capped monotone Newton ascent, Laplace fits at the end
  points, and the merging of fits that lie within a few of each other's standard deviations.

Each caller passes its own constants (margin, interior points, radius), stated where it calls.
Nothing here imports an algorithm: the modules sit below the samplers.
"""
