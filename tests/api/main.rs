mod stripe_contract;
