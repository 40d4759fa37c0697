class CheckpointError(ValueError):
    pass
def load_checkpoint(model, source): raise NotImplementedError
def save_checkpoint(model, path): raise NotImplementedError
