import { useTracklet } from 'tracklet/react';

const products = [
  { id: 1, name: 'Espresso cup', price: 12 },
  { id: 2, name: 'Milk jug', price: 18 },
  { id: 3, name: 'Grinder', price: 95 },
];

export function Shop() {
  const { track, pendingCount, isProcessing } = useTracklet();
  return (
    <>
      <ul>
        {products.map((p) => (
          <li key={p.id}>
            {p.name} ({p.price} €){' '}
            <button className="add" data-product={p.id} onClick={() => track('Product Added', { productId: p.id, price: p.price })}>
              Add to cart
            </button>
          </li>
        ))}
      </ul>
      <p id="hook-state">
        {pendingCount} pending{isProcessing ? ', sending' : ''}
      </p>
    </>
  );
}
