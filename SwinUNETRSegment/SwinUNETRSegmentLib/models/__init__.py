"""What a model is: its card, its network, its weights, and the catalog that names them.

- :mod:`.cards`: model cards (JSON), validated field by field; the label table.
- :mod:`.segment_table`: a card's labels as a segmentation's segments (name, colour, terminology).
- :mod:`.catalog`: named models, checksummed weights, install, download, remove.
- :mod:`.download`: the HTTP transfer, resumed after a dropped connection.
- :mod:`.bundle`: a MONAI bundle read into a card without running anything it names.
- :mod:`.networks`: the network a card describes; :mod:`.swin_unet`: the Swin-Unet decoder.
- :mod:`.checkpoint`: weights read safely and loaded completely.

The submodules are imported on use (``from SwinUNETRSegmentLib.models.cards import load_card``);
:mod:`.cards` and :mod:`.catalog` need neither PyTorch nor MONAI.
"""

__all__ = ["bundle", "cards", "catalog", "checkpoint", "download", "networks", "segment_table", "swin_unet"]
