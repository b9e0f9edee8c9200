"""Procedural indoor scenes with exact depth and instance masks: demo data for depth tasks without a download.

Each scene is a box-shaped room (floor, ceiling, three walls) seen from inside by a pinhole camera with a small
random pitch and yaw, holding 2-5 spheres and boxes that rest on the floor. Every pixel's ray is cast analytically
against the planes, spheres and slabs, so the depth is exact: the camera-frame z of the first hit (what NYUv2's
Kinect depth measures), in metres, always inside (0.5, 10) m. The RGB is Lambert shading of per-surface colours
with a checkered floor; the instance map gives 0 for the room and k for the k-th object, whose shape
(:data:`OBJECT_KINDS`) is ``kinds[k - 1]``. A scene is a pure function
of ``(seed, index, size)``: any index is rendered on demand, identically on every machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FOV_DEGREES = 60.0
"""Horizontal field of view (NYUv2's Kinect: about 57 degrees)."""
LIGHT = np.array([0.3, -0.8, -0.5]) / np.linalg.norm([0.3, -0.8, -0.5])
"""Direction towards the light in camera axes (x right, y down, z forward): from above, behind the camera."""
OBJECT_KINDS = ("sphere", "box")
"""The shapes an object can have: the classes of the procedural instance-segmentation set."""


@dataclass(frozen=True)
class Scene:
    """``rgb`` (H, W, 3) uint8, ``depth`` (H, W) float32 metres, ``instances`` (H, W) int64 (0 = room); ``room``
    (half width, floor and ceiling distance from the camera, back wall, in metres) and ``rotation`` (camera to room
    axes) describe the geometry the pixels were cast against; ``kinds[k - 1]`` is object k's shape, one of
    :data:`OBJECT_KINDS` (an object hidden by nearer ones has a kind but no pixel in ``instances``)."""

    rgb: np.ndarray
    depth: np.ndarray
    instances: np.ndarray
    room: dict[str, float]
    rotation: np.ndarray
    kinds: tuple[str, ...] = ()


def _rotation(pitch: float, yaw: float) -> np.ndarray:
    cp, sp, cy, sy = np.cos(pitch), np.sin(pitch), np.cos(yaw), np.sin(yaw)
    about_x = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    about_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    return about_y @ about_x


def _hit_planes(d: np.ndarray, room: dict[str, float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nearest room-surface hit of rays ``d`` (N, 3) from the origin: ``t``, surface index, unit normal."""
    planes = [  # (axis, coordinate, inward normal)
        (0, -room["half_width"], (1, 0, 0)),
        (0, room["half_width"], (-1, 0, 0)),
        (1, room["floor"], (0, -1, 0)),
        (1, -room["ceiling"], (0, 1, 0)),
        (2, room["back"], (0, 0, -1)),
    ]
    t = np.full(len(d), np.inf)
    surface = np.zeros(len(d), dtype=np.int64)
    with np.errstate(divide="ignore", invalid="ignore"):
        for k, (axis, coord, _) in enumerate(planes):
            tk = coord / d[:, axis]
            better = (tk > 0) & (tk < t)
            t[better], surface[better] = tk[better], k
    normals = np.array([n for _, _, n in planes], dtype=np.float64)[surface]
    return t, surface, normals


def _hit_sphere(d: np.ndarray, center: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    a = (d * d).sum(1)
    b = -2.0 * d @ center
    c = center @ center - radius * radius
    disc = b * b - 4 * a * c
    with np.errstate(invalid="ignore"):
        t = (-b - np.sqrt(disc)) / (2 * a)
    t = np.where((disc >= 0) & (t > 0), t, np.inf)
    points = d * t[:, None]
    return t, (points - center) / radius


def _hit_box(d: np.ndarray, low: np.ndarray, high: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Slab test of an axis-aligned box; the normal is the face of the entering slab."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t1, t2 = low / d, high / d
    near, far = np.minimum(t1, t2), np.maximum(t1, t2)
    t_near, t_far = near.max(1), far.min(1)
    t = np.where((t_near <= t_far) & (t_near > 0), t_near, np.inf)
    axis = near.argmax(1)
    normals = np.zeros_like(d)
    normals[np.arange(len(d)), axis] = -np.sign(d[np.arange(len(d)), axis])
    return t, normals


def render_scene(size: int | tuple[int, int], seed: int, index: int) -> Scene:
    """Scene ``index`` of the stream ``seed``, rendered at ``size`` (side, or ``(height, width)``) pixels."""
    height, width = (size, size) if isinstance(size, int) else size
    if height < 1 or width < 1:
        raise ValueError(f"scene size must be positive, got {height}x{width}")
    rng = np.random.default_rng([seed % 2**63, index % 2**63])
    room = {
        "half_width": rng.uniform(1.5, 3.0),
        "floor": rng.uniform(1.0, 1.6),  # camera height above the floor (y points down)
        "ceiling": rng.uniform(1.0, 1.6),
        "back": rng.uniform(4.0, 8.0),
    }
    focal = 0.5 * width / np.tan(np.radians(FOV_DEGREES) / 2)
    v, u = np.mgrid[0:height, 0:width].astype(np.float64)
    camera_rays = np.stack([(u + 0.5 - width / 2) / focal, (v + 0.5 - height / 2) / focal, np.ones_like(u)], -1)
    rotation = _rotation(rng.uniform(-0.12, 0.12), rng.uniform(-0.15, 0.15))
    # camera-frame rays have z = 1, so the ray parameter t of a hit is its camera-frame depth
    d = camera_rays.reshape(-1, 3) @ rotation.T
    t, surface, normals = _hit_planes(d, room)
    instances = np.zeros(len(d), dtype=np.int64)
    colours = rng.uniform(0.35, 0.9, size=(5, 3))[surface]
    kinds = []
    for k in range(1, int(rng.integers(2, 6)) + 1):
        radius = rng.uniform(0.25, 0.6)
        x = rng.uniform(-room["half_width"] + radius, room["half_width"] - radius)
        z = rng.uniform(1.8, room["back"] - radius)
        kinds.append(OBJECT_KINDS[int(rng.random() >= 0.5)])
        if kinds[-1] == "sphere":
            center = np.array([x, room["floor"] - radius, z])
            tk, nk = _hit_sphere(d, center, radius)
        else:
            half = np.array([radius, rng.uniform(0.3, 1.0), radius * rng.uniform(0.7, 1.4)])
            base = np.array([x, room["floor"], z])
            tk, nk = _hit_box(d, base - half * np.array([1, 2, 1]), base + half * np.array([1, 0, 1]))
        nearer = tk < t
        t[nearer], normals[nearer], instances[nearer] = tk[nearer], nk[nearer], k
        colours[nearer] = rng.uniform(0.2, 1.0, size=3)
    points = d * t[:, None]
    floor = (instances == 0) & (surface == 2)
    checker = (np.floor(points[:, 0] * 2) + np.floor(points[:, 2] * 2)) % 2
    colours[floor] *= np.where(checker[floor] > 0, 1.0, 0.7)[:, None]
    shade = 0.35 + 0.65 * np.clip(normals @ (rotation @ LIGHT), 0.0, None)
    rgb = np.clip(colours * shade[:, None] * 255.0, 0, 255).round().astype(np.uint8)
    return Scene(
        rgb=rgb.reshape(height, width, 3),
        depth=t.reshape(height, width).astype(np.float32),
        instances=instances.reshape(height, width),
        room=room,
        rotation=rotation,
        kinds=tuple(kinds),
    )
