"""Data sets (digits, Fashion-MNIST/MNIST IDX, CIFAR-10 pickle) and federated partitions."""

from server_app.data.datasets import Dataset, load_dataset
from server_app.data.partition import FederatedSplit, dirichlet_partition, iid_partition, make_federated_split

__all__ = ["Dataset", "FederatedSplit", "dirichlet_partition", "iid_partition", "load_dataset", "make_federated_split"]
