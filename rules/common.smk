import json

RESULTS = f"{config['results']}/{config['run']}"
SPLITS = ["train", "val", "test"]


def out(path):
    """Path of an artifact of this run."""
    return f"{RESULTS}/{path}"


def stage_config(*sections):
    """JSON of what one stage reads (seed, device and its sections): a rule param, so editing
    a section reruns exactly the stages that read it."""
    view = {"seed": config["seed"], "device": config["device"]}
    view.update({name: config[name] for name in sections})
    return json.dumps(view, sort_keys=True)


def annotation_json():
    if config["data"]["source"] == "synthetic":
        return out("data/synthetic/annotations.json")
    return config["data"]["annotations"]


def image_root():
    if config["data"]["source"] == "synthetic":
        return out("data/synthetic")
    return config["data"]["image_root"]


def all_targets():
    return [
        out("retriever/metrics.json"),
        *expand(out("features/{split}_gallery.parquet"), split=SPLITS),
        *expand(out("features/{split}_queries.parquet"), split=SPLITS),
    ]
