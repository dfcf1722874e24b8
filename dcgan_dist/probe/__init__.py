"""The paper's linear probe (section 5.1, Tables 1 and 2) as one part: `python -m dcgan_dist.probe`
(__main__.py: the command, its table, JSON and MLflow logging), the protocol on one set of
features (protocol.py: BatchNorm statistics, features, C on validation, the authors' draws), the
L2-SVM solvers (svm.py: liblinear, and a torch one on float16 features held once), and the data
sets with their splits (data.py: CIFAR-10, SVHN, digits).

Nothing loads here: `python -m dcgan_dist.probe` imports this package before its __main__, and
--help answers before torch loads.
"""
