"""Writing and publishing fused checkpoints, shared by the converter and the trainer: what a fused checkpoint folder
holds (`folders`), its model card (`model_card`) and the Hub (`hub`: reachability, the upload in one commit)."""
