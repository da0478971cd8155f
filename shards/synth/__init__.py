"""A synthetic stand-in for Cityscapes, written in the exact Cityscapes folder layout.

Every city of every city set of a task protocol gets ``images_per_city`` street scenes::

    OUT/leftImg8bit/{split}/{city}/{city}_000000_{frame:06d}_leftImg8bit.png   (RGB)
    OUT/gtFine/{split}/{city}/{city}_000000_{frame:06d}_gtFine_labelIds.png    (L, label ids)
    OUT/gtFine/{split}/{city}/{city}_000000_{frame:06d}_gtFine_instanceIds.png (16-bit)
    OUT/gtFine/{split}/{city}/{city}_000000_{frame:06d}_gtFine_color.png       (RGBA palette)

The ground truth uses the official Cityscapes encodings (``cityscapesscripts.preparation``'s
``json2labelImg`` and ``json2instanceImg``): ``instanceIds`` holds ``labelId * 1000 + i`` on
the pixels of every drawn object of a class with instances (person, rider, car, …; ``i``
counts that class's objects of the frame from 0, in drawing order) and the label id
elsewhere; ``color`` is the label ids in the Cityscapes palette, RGBA. The official scripts
(``evalPixelLevelSemanticLabeling``) therefore run on this tree unchanged.

A scene is a street in perspective: sky; buildings, walls, fences and hedges along both sides;
road with lane markings between sidewalks; terrain verges; trees; poles carrying traffic signs
and lights; cars, trucks, buses, trams, persons, riders on bicycles and motorcycles; void
(ego vehicle, static and dynamic objects, unlabelled blobs). Every frame shows classes of all
three tasks. Classes differ by texture, shape and position, their colour ranges overlap, and
each frame gets its own illumination and pixel noise, so per-pixel colour alone does not
segment a frame but a small conv net does.

Each frame's random generator is derived from ``(seed, city, index)`` only, so the output is
byte-identical for the same arguments whatever the number of worker processes.

Modules, by what they draw: ``palette`` (label ids, colours), ``canvas`` (drawing primitives,
shared textures), ``street`` (perspective geometry, the ground), ``scenery`` (sky, buildings,
street-side planes, trees), ``objects`` (what stands on the ground), ``frame`` (one frame's
layers, photometry and encodings) and ``files`` (jobs, the tree on disk, :func:`generate`).
"""

from shards.synth.canvas import _Canvas as _Canvas
from shards.synth.files import SynthSummary, frame_name, generate
from shards.synth.frame import SynthFrame, color_image, instance_ids, render_frame
from shards.synth.objects import _car as _car
from shards.synth.objects import _rider_on as _rider_on

# Besides the public API, ``_Canvas``, ``_car`` and ``_rider_on`` (re-exported: ``x as x``) for
# tests/test_synth.py, which draws with them directly.
__all__ = [
    "SynthFrame",
    "SynthSummary",
    "color_image",
    "frame_name",
    "generate",
    "instance_ids",
    "render_frame",
]
