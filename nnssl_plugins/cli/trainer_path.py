"""nnssl_trainer_path: print the folder to add to nnUNet_extTrainer (only needed if the .pth hook is off)."""
import os


def trainer_discovery_folder() -> str:
    import nnssl_plugins

    return os.path.join(os.path.dirname(nnssl_plugins.__file__), "_trainer_path")


def ensure_trainer_discovery() -> None:
    """Make stock nnU-Net's trainer search see our trainers in this process (and its children)."""
    d = trainer_discovery_folder()
    cur = [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    if d not in cur:
        os.environ["nnUNet_extTrainer"] = os.pathsep.join(cur + [d])


def main():
    print(trainer_discovery_folder())


if __name__ == "__main__":
    main()
