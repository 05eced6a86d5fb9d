"""Colour of ray hits: albedo x texture noise x Lambert shading, plus sky and sensor noise.

The texture is value noise hashed from object-fixed coordinates, so it sticks to surfaces across views and
moves with moving objects. Together with per-instance colours drawn from palettes that several classes share
(grey road, grey walls, grey cars), it keeps colour from giving the class away.
"""
from __future__ import annotations

import numpy as np

from .raycast import Hits

_HASH_PRIMES = np.array([73856093, 19349663, 83492791], dtype=np.uint64)


def value_noise(coords: np.ndarray, cell: float, salt: int = 0) -> np.ndarray:
    """Blocky noise in [0, 1): one pseudo-random value per cubic cell of side ``cell`` metres."""
    q = np.floor(coords / cell).astype(np.int64).view(np.uint64)
    h = (q * _HASH_PRIMES).sum(axis=1, dtype=np.uint64) ^ np.uint64(salt)
    h = h * np.uint64(0x2545F4914F6CDD1D)
    return ((h >> np.uint64(40)) & np.uint64(0xFFFFFF)).astype(np.float64) / float(1 << 24)


def shade(hits: Hits, light_direction, ambient: float, sky: bool, rng: np.random.Generator,
          pixel_noise: float = 4.0) -> np.ndarray:
    """RGB uint8 [N,3] for the rays of ``hits``.

    ``light_direction`` is a unit world vector pointing towards the light; ``ambient`` (0..1) the share of
    light that reaches surfaces facing away; ``sky`` paints rays that hit nothing as sky (else black);
    ``pixel_noise`` is the standard deviation of the sensor noise in 8-bit units, drawn from ``rng``."""
    light = np.asarray(light_direction, np.float64)
    lambert = np.clip(hits.normal @ light, 0.0, 1.0)
    brightness = ambient + (1.0 - ambient) * lambert
    texture = (0.82 + 0.36 * value_noise(hits.texcoord, 0.6, 1)) * (0.9 + 0.2 * value_noise(hits.texcoord, 0.08, 2))
    colour = hits.albedo * (brightness * texture)[:, None]

    facade = hits.facade
    on_facade = ~np.isnan(facade[:, 0])
    if on_facade.any():
        h, v = facade[on_facade, 0], facade[on_facade, 1]
        # a window every 3 m along the face, one per 3.2 m storey, none on the ground floor
        window = (np.mod(h, 3.0) > 0.8) & (np.mod(h, 3.0) < 2.2) & (np.mod(v, 3.2) > 1.0) & (v > 3.2)
        glass = np.array([0.16, 0.2, 0.26]) * (0.7 + 0.6 * value_noise(hits.texcoord[on_facade], 1.5, 3))[:, None]
        colour[np.flatnonzero(on_facade)[window]] = glass[window]

    missed = ~hits.hit
    if sky and missed.any():
        up = np.clip(hits.directions[missed, 2], 0.0, 1.0)[:, None]
        horizon, zenith = np.array([0.82, 0.85, 0.88]), np.array([0.42, 0.58, 0.85])
        colour[missed] = horizon + (zenith - horizon) * np.sqrt(up)
    rgb = colour * 255.0 + rng.normal(0.0, pixel_noise, colour.shape)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
