pytest_plugins = ["lens.testing"]
