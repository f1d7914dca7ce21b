"""Self-supervised pretraining of a tile encoder on the user's own slides (``weakstil pretrain``)."""
