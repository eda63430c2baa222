"""Task data for the applications: image classification (`images`), the pasted-objects segmentation task
(`segmentation`) and known-warp optical-flow pairs (`optical_flow`). The HKT method itself needs none of them."""
