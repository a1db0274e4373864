"""Small-model zoo: architecture plans (archs, no TF), the TF builder (builder, tf_graph: extra
`export`) and the Fashion-MNIST bench. Importing this package does not import TensorFlow."""
