"""`mnemosyne plan`: ranked parallel layouts for one long request, predicted from the step-time model."""
