"""The paper's recipe in one place (paper-spec §5-§6): training, data split and evaluation constants.

config.py takes its defaults from here and comparability.py judges runs against it, so the paper
profile, the code defaults and the "comparable with the paper" check cannot drift apart. Constants only:
every stage imports this file, so logic lives elsewhere.
"""
from __future__ import annotations

# --- training (paper-spec §5) ------------------------------------------------------------------
EPOCHS = 200
BATCH_SIZE = 128
LR = 0.1
MOMENTUM = 0.9
NESTEROV = False
WEIGHT_DECAY = 5e-4
MILESTONES = (80, 120, 160)
LR_GAMMA = 0.1
SCHEDULE = "step"
AUGMENT = True
TRAIN_PGD = {"eps": 0.031, "step": 0.007, "steps": 10, "random_start": True}
RELAX = {"eta0": 1.0, "rho": 1.05, "hard_epoch": 120}
TRADEOFF_WEIGHTS = {"w_adv": 8.0, "w_nat": 1.0}  # authors' code: L = 8 CE(adv) + 1 CE(clean)
TRADES_BETA = 4.0

# --- data (paper-spec §5, §9) -------------------------------------------------------------------
TRAIN_IMAGES = 45000  # 50k official training images minus our seeded 5k selection hold-out
VAL_IMAGES = 5000
TEST_IMAGES = 10000

# --- evaluation (paper-spec §6) -----------------------------------------------------------------
PAPER_EPS = 0.031
PAPER_ATTACKS = ("natural", "fgsm", "ifgsm20", "cw_ref")  # the paper's columns, in order
PAPER_COLUMNS = {"natural": "A1", "fgsm": "A2", "ifgsm20": "A3", "cw_ref": "A4"}
ATTACK_LABELS = {"natural": "natural", "fgsm": "FGSM", "ifgsm20": "IFGSM20", "cw_ref": "C&W (ref.)"}
EVAL_SEEDS = 5  # noise seeds of the paper profile (the paper reports single draws; we ask for 5)
# How each column is run: the attacks.py function ("natural": none), its eps, its options beyond eps (an option left
# out takes the function's default), the EOT and whether a noisy model keeps its noise on (white-box, noise on).
# A4 is the reference C&W as the reference code computed it under PyTorch 0.4, with w and x aliased ("aliased"):
# what produced the reported numbers; attacks.cw_ref's own default, "spec", barely perturbs (paper-spec §6).
PAPER_ATTACK_SETTINGS = {
    "natural": {"function": "natural", "eps": 0.0, "options": {}, "eot": 1, "noise": True},
    "fgsm": {"function": "fgsm", "eps": PAPER_EPS, "options": {}, "eot": 1, "noise": True},
    "ifgsm20": {"function": "ifgsm20", "eps": PAPER_EPS, "options": {}, "eot": 1, "noise": True},
    "cw_ref": {"function": "cw_ref", "eps": PAPER_EPS, "options": {"variant": "aliased"}, "eot": 1, "noise": True},
}

# --- datasets of the authors' grid (the paper: CIFAR-10; the EnResNet poster: CIFAR-100; the authors'
# README: CIFAR-100 and SVHN) ----------------------------------------------------------------------
DATASETS = ("cifar10", "cifar100", "svhn")
DEFAULT_DATASET = "cifar10"
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "svhn": 10}
# Official split sizes (train, test); SVHN without `extra`, which the authors do not use.
OFFICIAL_COUNTS = {"cifar10": (50000, 10000), "cifar100": (50000, 10000), "svhn": (73257, 26032)}
DATASET_LABELS = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "svhn": "SVHN"}

# Training / test images of the recipe per dataset: the official training split minus the VAL_IMAGES
# hold-out, and the whole official test split (TRAIN_IMAGES / TEST_IMAGES are CIFAR-10's).
TRAIN_IMAGES_BY_DATASET = {d: n - VAL_IMAGES for d, (n, _) in OFFICIAL_COUNTS.items()}
TEST_IMAGES_BY_DATASET = {d: n for d, (_, n) in OFFICIAL_COUNTS.items()}
