"""Vectorised ray-primitive intersection in numpy, for the generated scenes.

Every function takes one ray origin ``o`` (3,) and ``P`` ray directions ``d`` (P, 3) (not
necessarily unit length) in world coordinates and returns ``t`` (P,) -- the ray parameter of the
first hit in front of the origin, ``inf`` where the ray misses -- and the unit surface normal
(P, 3) at that hit, facing the ray's side of the surface. A hit point is ``o + t * d``.
"""

from __future__ import annotations

import numpy as np

_EPS = 1e-6


def _first_positive(t_near: np.ndarray, t_far: np.ndarray) -> np.ndarray:
    return np.where(t_near > _EPS, t_near, np.where(t_far > _EPS, t_far, np.inf))


def room_from_inside(
    o: np.ndarray, d: np.ndarray, *, lo: np.ndarray, hi: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rays starting inside the box ``[lo, hi]`` -> (t, normal, axis (P,) int of the wall hit)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t_axis = (np.where(d > 0, hi, lo) - o) / d
    t_axis = np.where(d == 0, np.inf, t_axis)
    axis = np.argmin(t_axis, axis=1)
    rows = np.arange(len(d))
    t = t_axis[rows, axis]
    normal = np.zeros_like(d)
    normal[rows, axis] = -np.sign(d[rows, axis])
    return t, normal, axis


def yaw_matrix(yaw: float) -> np.ndarray:
    """Rotation about the world's vertical (y) axis: local -> world."""
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def box(
    o: np.ndarray, d: np.ndarray, *, center: np.ndarray, half: np.ndarray, yaw: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Box of half extents ``half`` rotated by ``yaw`` about y -> (t, normal, local hit (P, 3))."""
    rot = yaw_matrix(yaw)
    o_local = (o - center) @ rot
    d_local = d @ rot
    with np.errstate(divide="ignore", invalid="ignore"):
        t1 = (-half - o_local) / d_local
        t2 = (half - o_local) / d_local
    # A ray parallel to a slab and inside it never leaves that slab: (-inf, inf).
    parallel = d_local == 0
    inside = np.abs(o_local) <= half
    t1 = np.where(parallel, np.where(inside, -np.inf, np.inf), t1)
    t2 = np.where(parallel, np.where(inside, np.inf, -np.inf), t2)
    t_near_axes = np.minimum(t1, t2)
    axis = np.argmax(t_near_axes, axis=1)
    rows = np.arange(len(d))
    t_near = t_near_axes[rows, axis]
    t_far = np.maximum(t1, t2).min(axis=1)
    hit = (t_near <= t_far) & (t_near > _EPS)
    t = np.where(hit, t_near, np.inf)
    n_local = np.zeros_like(d)
    n_local[rows, axis] = -np.sign(d_local[rows, axis])
    local = o_local + np.where(hit, t, 0.0)[:, None] * d_local
    return t, n_local @ rot.T, local


def sphere(
    o: np.ndarray, d: np.ndarray, *, center: np.ndarray, radius: float
) -> tuple[np.ndarray, np.ndarray]:
    """Sphere -> (t, outward normal) of the first crossing in front of the origin."""
    oc = o - center
    a = (d * d).sum(axis=1)
    b = 2.0 * (d @ oc)
    c = oc @ oc - radius**2
    disc = b * b - 4.0 * a * c
    root = np.sqrt(np.maximum(disc, 0.0))
    t = _first_positive((-b - root) / (2.0 * a), (-b + root) / (2.0 * a))
    t = np.where(disc >= 0, t, np.inf)
    point = o + np.where(np.isfinite(t), t, 0.0)[:, None] * d
    return t, (point - center) / radius


def cylinder(
    o: np.ndarray, d: np.ndarray, *, center_xz: np.ndarray, radius: float, height: float
) -> tuple[np.ndarray, np.ndarray]:
    """Vertical cylinder standing on y = 0 with its top cap at ``height`` -> (t, normal).

    The bottom cap lies on the floor and is never visible from inside the room.
    """
    ox, oz = o[0] - center_xz[0], o[2] - center_xz[1]
    dx, dz = d[:, 0], d[:, 2]
    a = dx * dx + dz * dz
    b = 2.0 * (ox * dx + oz * dz)
    c = ox * ox + oz * oz - radius**2
    disc = b * b - 4.0 * a * c
    with np.errstate(divide="ignore", invalid="ignore"):
        t_side = (-b - np.sqrt(np.maximum(disc, 0.0))) / (2.0 * a)
        y_side = o[1] + t_side * d[:, 1]
        ok_side = (disc >= 0) & (a > 0) & (t_side > _EPS) & (y_side >= 0) & (y_side <= height)
        t_side = np.where(ok_side, t_side, np.inf)
        t_top = (height - o[1]) / d[:, 1]
        px, pz = ox + t_top * dx, oz + t_top * dz
        ok_top = (t_top > _EPS) & (px * px + pz * pz <= radius**2) & (o[1] > height)
    t_top = np.where(ok_top, t_top, np.inf)
    t = np.minimum(t_side, t_top)
    ts = np.where(np.isfinite(t_side), t_side, 0.0)
    side_normal = np.stack([ox + ts * dx, np.zeros_like(ts), oz + ts * dz], axis=1) / radius
    top_normal = np.broadcast_to(np.array([0.0, 1.0, 0.0]), d.shape)
    normal = np.where((t_top < t_side)[:, None], top_normal, side_normal)
    return t, normal
