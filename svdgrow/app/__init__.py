"""The training application: ``svdgrow train|plot|summary`` (models, data, loop, run folders)."""
