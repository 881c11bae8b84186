"""Expert predictors: the interface, every predictor, training and accuracy metrics."""
