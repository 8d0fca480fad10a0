"""The fits tests/test_mpi.py runs under mpirun (tests/mpi_worker.py) and in
one process, written once for both."""

#: The estimator of most scenarios.
SETTINGS = dict(latent_dims=(8, 4), hidden_dims=(32,), likelihood="bernoulli", n_epochs=3,
                batch_size=100, random_state=0, n_threads=1, free_bits=0.05)

#: The models with a discriminator or beta-TCVAE's terms, trained
#: data-parallel (on top of SETTINGS).
VARIANTS = {
    "factorvae": dict(tc_weight=4.0, discriminator_hidden=(16, 16),
                      discriminator_learning_rate=1e-3),
    "density_ratio": dict(prior="density_ratio", discriminator_hidden=(16, 16),
                          discriminator_learning_rate=1e-3),
    "tcvae": dict(tcvae_weights=(1.0, 4.0, 1.0), free_bits=0.0),
}
