"""Krum (Blanchard et al., 2017): Flower's Krum. The round's model is the one site's adapter
whose n − f − 2 nearest neighbours are closest (f = ``federation.krum-byzantine``): sound
when sites > 2f + 2. Every accepted site counts in ``sites_used``, though one site's update
becomes the model. Overrides nothing but what :class:`~fedhaven.strategies.base.Validated` adds.
"""

from __future__ import annotations

from flwr.serverapp.strategy import Krum as FlowerKrum

from fedhaven.strategies.base import Validated


class Krum(Validated, FlowerKrum):
    pass
