import pytest
import tensorflow as tf


@pytest.fixture(autouse=True)
def _seed():
    tf.keras.utils.set_random_seed(0)
