"""open_clip models as clipkit towers: its factory without silent downloads (``factory``) and its image
and text towers split out of one model (``towers``). Below the model, which builds its towers from here."""
